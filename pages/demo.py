import streamlit as st
st.title('demo')
